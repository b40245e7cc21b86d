from ewq.cli import main

main()
