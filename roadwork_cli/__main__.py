from roadwork_cli.cli.app import main

main()
