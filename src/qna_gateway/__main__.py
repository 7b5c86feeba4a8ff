"""`python -m qna_gateway` is the `qna-gateway` command."""

from .cli import main

raise SystemExit(main())
