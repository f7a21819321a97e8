"""Thin HTTP routes: predict, distill, auth, admin, health."""
