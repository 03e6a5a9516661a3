import sys

from tcpserver.cli import main

sys.exit(main())
