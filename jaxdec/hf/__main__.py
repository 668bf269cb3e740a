"""`python -m jaxdec.hf --checkpoint DIR "text" ...`: the command line of `jaxdec.hf.cli`."""

import sys

from jaxdec.hf.cli import main

sys.exit(main())
