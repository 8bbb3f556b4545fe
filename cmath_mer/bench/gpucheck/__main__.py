import sys

from cmath_mer.bench.gpucheck.driver import main

sys.exit(main())
