"""The migration engine: pre-copy policy, sender and receiver orchestration."""
