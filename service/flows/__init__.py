"""The two inference paths as flows that every protocol shares: one rate limit, one quota, one audit."""
