"""Who is calling and what they may do, for both services: the caller (Actor),
authentication and permissions, and the rules for API tokens and accounts."""
