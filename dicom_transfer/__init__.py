"""dicom-transfer: verified, throttled, resumable C-MOVE of DICOM series through Orthanc."""

__version__ = "0.1.0"
