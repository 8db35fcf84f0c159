"""AffinityNet and random-walk pseudo masks (REFERENCE §4)."""
