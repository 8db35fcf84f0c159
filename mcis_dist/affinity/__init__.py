"""AffinityNet and random-walk pseudo masks (psa; paper §4.4)."""
