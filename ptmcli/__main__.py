from ptmcli.cli import run

run()
