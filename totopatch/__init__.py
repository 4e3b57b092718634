"""totopatch: safe, reversible patches that make Toto compile-friendly."""
__version__ = "0.1.0"
