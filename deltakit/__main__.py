from deltakit.cli import main

main()
