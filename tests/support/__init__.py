"""What the tests share, by purpose (fixtures that need pytest's scopes live in conftest.py)."""
