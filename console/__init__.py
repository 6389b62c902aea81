"""Read-only operator views and commands: the terminal dashboard, the alert follower, state views."""
