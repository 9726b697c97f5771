"""`python -m mmm4rec ...` = the `mmm4rec` console script."""
import sys

from .cli import main

sys.exit(main())
