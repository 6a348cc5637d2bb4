"""The one place that names a user's Channels group."""


def user_group(uid: int) -> str:
    """Group of every socket logged in as uid (stock layer path)."""
    return f"push.user.{uid}"
