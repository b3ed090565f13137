from dsran.pipelines.cli import main

main()
