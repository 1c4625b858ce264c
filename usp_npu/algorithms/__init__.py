"""The ring schedule, the ring loop, and the Ulysses x ring composition."""
