import sys

from cmath_mer.bench.cli import main

sys.exit(main())
