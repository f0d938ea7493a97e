from smartnatd.cli import main

raise SystemExit(main())
