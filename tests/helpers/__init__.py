"""What the test modules share: small models, float64 references, Trainer and event-file helpers.

Test modules import from here only, never from one another.
"""
