"""`python main.py --batch series.csv`: the same as the `dicom-transfer` command."""

from dicom_transfer.cli import main

if __name__ == "__main__":
    main()
