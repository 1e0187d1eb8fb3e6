import sys

from lowbit.cli.parser import main

sys.exit(main())
