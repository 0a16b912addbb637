from mlopt.cli.main import main

main()
