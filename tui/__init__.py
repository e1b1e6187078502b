"""The operator terminal UI (Textual). Built in its own issue."""
