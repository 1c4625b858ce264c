"""Communication: the Ulysses all-to-all and the ring's point-to-point exchange."""
