from hyloom.cli import main

raise SystemExit(main())
