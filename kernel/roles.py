"""Chat roles the layers agree on."""

# The developer's turns: `developer` is OpenAI's newer name for the system turn.
INSTRUCTION_ROLES = ("system", "developer")
