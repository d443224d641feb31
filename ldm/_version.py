"""The package version, in a module of its own: modules inside ldm read it without importing the
package's public API (and so without an import cycle through ldm/__init__)."""

__version__ = "0.1.0"  # keep equal to [project] version in pyproject.toml
