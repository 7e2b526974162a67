from servercore.cli import main

raise SystemExit(main())
