from loraport.cli import main

main()
