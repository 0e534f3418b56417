"""primesvt's own plugins; each module is an entry point of group ``primesvt``."""
