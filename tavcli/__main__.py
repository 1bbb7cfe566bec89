from tavcli.cli import main

main()
