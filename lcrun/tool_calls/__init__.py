"""Tool calls (function calling) for the chat templates models ship with, as llama-server's common/chat.cpp does
them: the family of a template decides how tools are shown to the model, how its calls are spelled and parsed, and
the grammar that holds a call to the declared functions' parameters.

- `specs`: the declared tools (`ToolSpec`, their parameters checked as any JSON schema), the calls (`ToolCall`), the
  request's choice (`ToolChoice`: auto, none, required, one function; parallel calls or not) and their bounds;
- `formats`: the families — Llama 3.x (JSON calls, the ipython role), Hermes/Qwen (`<tool_call>`), Mistral Nemo
  (`[TOOL_CALLS]`), and a generic JSON format for every other template — detected from the template's text; each
  gives the grammar (lazy: it constrains from the token that starts a call) and parses a reply into content and
  calls;
- `prompt`: the conversation as the template takes it (assistant calls and tool results in OpenAI's shape, or, for
  the generic family, written into the messages), the client's text marked as data;
- `stream`: a streamed reply split as it comes: content while it is content, a call once one starts."""
