from histmol.cli import main

main()
