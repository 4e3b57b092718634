from totopatch.cli import main

main()
