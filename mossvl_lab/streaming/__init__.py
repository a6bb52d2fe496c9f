"""Real-time streaming: the steppable RealtimeSession, its events and policies, and the threaded queue APIs."""
