"""The launch: what the user asked for (a typed `LaunchOptions`, built once from the command line) → the GGUF
(`model_file`) → the planner's choice, the chat format and the EngineConfig (`decide.decide_launch`, no engine
imported: `--dry-run` stays fast) → a loaded model that owns its engine (`loaded.open_model`). chat, serve, niah and
bench all start this way; ui/ only renders what the launch reports."""
