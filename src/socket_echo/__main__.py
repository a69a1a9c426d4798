from socket_echo.cli import main

main()
