import sys

from apt_deploy.cli import main

sys.exit(main())
