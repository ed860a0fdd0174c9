"""Command-line entry points.

Importing the package silences the library notices no user can act on (:mod:`oxford_ir.cli.library_notices`),
so that every command's output holds only what it says itself.
"""

from oxford_ir.cli.library_notices import silence_library_notices

silence_library_notices()
