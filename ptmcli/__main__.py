from ptmcli.cli import main

main()
