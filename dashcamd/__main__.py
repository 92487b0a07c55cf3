from dashcamd.cli import main

raise SystemExit(main())
