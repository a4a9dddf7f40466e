from evotool.cli import main

main()
