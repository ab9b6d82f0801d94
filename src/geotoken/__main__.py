from geotoken.cli import main

raise SystemExit(main())
