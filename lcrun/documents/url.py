"""An http(s) URL, fetched with httpx2 (BSD-3; the client huggingface_hub and openai already bring): redirects
followed a few times, the body streamed with a cap on its size and on the whole transfer's time, so a huge or a
trickling server is one line, not a hang."""
from __future__ import annotations

from dataclasses import dataclass

from lcrun import __version__
from lcrun.errors import DocumentError

from .record import Deadline, ReadLimits



@dataclass(frozen=True)
class Fetched:
    url: str              # after redirects
    data: bytes
    content_type: str     # the media type, lower case, without parameters ("" when the server sends none)
    charset: str | None


def is_url(text: str) -> bool:
    return text.lower().startswith(("http://", "https://"))


def fetch(url: str, limits: ReadLimits) -> Fetched:
    import httpx2 as httpx

    deadline = Deadline(url, limits.seconds)
    cap = limits.max_url_bytes
    timeout = httpx.Timeout(limits.connect_seconds)
    # identity: a compressed body could unpack far past the cap within one chunk
    headers = {"User-Agent": f"lcrun/{__version__}", "Accept-Encoding": "identity",
               "Accept": "text/html, application/pdf, text/*;q=0.9, */*;q=0.5"}
    try:
        with httpx.Client(follow_redirects=True, max_redirects=limits.max_redirects, timeout=timeout,
                          headers=headers) as client, client.stream("GET", url) as response:
            if response.status_code >= 400:
                raise DocumentError(url, f"the server answered HTTP {response.status_code} "
                                         f"{response.reason_phrase}".rstrip())
            declared = response.headers.get("Content-Length", "")
            if declared.isdigit() and int(declared) > cap:
                raise DocumentError(url, f"{int(declared) / (1 << 20):,.0f} MiB, more than the {cap >> 20} MiB "
                                         "lcrun fetches for one document")
            chunks: list[bytes] = []
            received = 0
            for chunk in response.iter_bytes():  # as they arrive (a chunk size would wait to fill it)
                received += len(chunk)
                if received > cap:
                    raise DocumentError(url, f"more than the {cap >> 20} MiB lcrun fetches for one document")
                chunks.append(chunk)
                deadline.check(f"to download ({received:,} bytes received)")
            media, _, params = response.headers.get("Content-Type", "").partition(";")
            charset = next((p.split("=", 1)[1].strip().strip('"') for p in params.split(";")
                            if p.strip().lower().startswith("charset=")), None)
            return Fetched(str(response.url), b"".join(chunks), media.strip().lower(), charset)
    except DocumentError:
        raise
    except httpx.TimeoutException:
        raise DocumentError(url, f"no answer within {limits.connect_seconds:g} s; stopped") from None
    except httpx.TooManyRedirects:
        raise DocumentError(url, f"more than {limits.max_redirects} redirects; stopped") from None
    except (httpx.InvalidURL, httpx.UnsupportedProtocol) as exc:
        raise DocumentError(url, f"not a URL lcrun can fetch ({exc})") from None
    except httpx.HTTPError as exc:
        raise DocumentError(url, f"cannot be fetched ({type(exc).__name__}: {exc})") from None
