"""The OpenAI-compatible HTTP server (`fullgraph serve`); see docs/server.md."""
