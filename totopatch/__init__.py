"""totopatch: safe, reversible patches that make Toto compile-friendly."""
__version__ = "0.2.0"
