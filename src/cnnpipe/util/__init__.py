"""Plumbing every part shares: one-line errors, atomic files, paths, env flags, locks, text."""
