# Debian 12 images of a smartnatd appliance: an AMI (amazon-ebs) and a qcow2 disk (qemu).
#
#   packer init packer/
#   packer build -only='amazon-ebs.debian12' packer/    # needs AWS credentials
#   packer build -only='qemu.debian12' packer/          # needs qemu-system-x86, xorriso, KVM
#
# The image holds the committed source tree (`git archive HEAD`: commit first) installed by
# provision.sh into /opt/smartnat, kube-proxy and kubectl, and the units, enabled: they start at
# every boot, the first included. Until an instance has /etc/smartnat/smartnat.env,
# /etc/smartnat/kubeconfig and /etc/smartnat/kube-proxy.kubeconfig (see
# etc/kubeconfig-from-serviceaccount.sh) they exit 78 and stay failed, without a restart loop.
# Write those files from cloud-init (write_files runs before network-online.target, which both
# units wait for) and the instance serves from its first boot; or write them by hand, then
# `systemctl restart kube-proxy smartnat`. enable_kube_proxy=false: "mode: direct" only.

packer {
  required_version = ">= 1.10.0"
  required_plugins {
    amazon = {
      source  = "github.com/hashicorp/amazon"
      version = ">= 1.3.0"
    }
    qemu = {
      source  = "github.com/hashicorp/qemu"
      version = ">= 1.1.0"
    }
  }
}

variable "smartnat_version" {
  type        = string
  default     = "0.1.0"
  description = "Goes into the image name."
}

variable "kube_version" {
  type        = string
  default     = ""
  description = "kube-proxy and kubectl release (dl.k8s.io); keep within kube-proxy's version skew of the cluster. Empty: the one pinned in packaging/kube-version."
}

variable "enable_kube_proxy" {
  type        = bool
  default     = true
  description = "Enable kube-proxy.service in the image; false when every Mapping uses mode: direct."
}

variable "aws_region" {
  type    = string
  default = "us-east-1"
}

variable "aws_instance_type" {
  type    = string
  default = "t3.small"
}

variable "aws_subnet_id" {
  type        = string
  default     = null
  description = "Subnet of the build instance; null = the default VPC."
}

variable "aws_ami_users" {
  type        = list(string)
  default     = []
  description = "AWS account ids that may launch the AMI."
}

variable "debian_cloud_image_url" {
  type    = string
  default = "https://cloud.debian.org/images/cloud/bookworm/latest/debian-12-genericcloud-amd64.qcow2"
}

variable "debian_cloud_image_checksum_url" {
  type        = string
  default     = "https://cloud.debian.org/images/cloud/bookworm/latest/SHA512SUMS"
  description = "Checksum file published next to the image; packer picks the line of the image's file name."
}

variable "qemu_accelerator" {
  type        = string
  default     = "kvm"
  description = "kvm where /dev/kvm exists, tcg otherwise (slow)."
}

locals {
  image_name = "smartnat-${var.smartnat_version}-debian12-${formatdate("YYYYMMDDhhmmss", timestamp())}"
  # Password of the temporary build user of the qemu build; the user is deleted before shutdown.
  build_password = uuidv4()
  tarball        = "/tmp/smartnat-src.tar.gz"
  # What provision.sh installs when var.kube_version is empty; for the AMI's tags only.
  kube_version = var.kube_version != "" ? var.kube_version : trimspace(file("${path.root}/../packaging/kube-version"))
}

source "amazon-ebs" "debian12" {
  region          = var.aws_region
  instance_type   = var.aws_instance_type
  subnet_id       = var.aws_subnet_id
  ami_name        = local.image_name
  ami_users       = var.aws_ami_users
  ami_description = "smartnatd ${var.smartnat_version} NAT appliance for Kubernetes Mappings (Debian 12)"

  source_ami_filter {
    filters = {
      name                = "debian-12-amd64-*"
      architecture        = "x86_64"
      root-device-type    = "ebs"
      virtualization-type = "hvm"
    }
    owners      = ["136693071363"] # Debian's official AMI account
    most_recent = true
  }

  ssh_username            = "admin" # Debian's cloud user on AWS
  temporary_key_pair_type = "ed25519"
  imds_support            = "v2.0"
  metadata_options {
    http_endpoint               = "enabled"
    http_tokens                 = "required"
    http_put_response_hop_limit = 1
  }

  tags = {
    Name             = local.image_name
    smartnat_version = var.smartnat_version
    kube_version     = local.kube_version
    base             = "{{ .SourceAMIName }}"
  }
}

source "qemu" "debian12" {
  iso_url        = var.debian_cloud_image_url
  iso_checksum   = "file:${var.debian_cloud_image_checksum_url}"
  disk_image     = true
  disk_size      = "4G"
  format         = "qcow2"
  disk_interface = "virtio"
  net_device     = "virtio-net"
  accelerator    = var.qemu_accelerator
  headless       = true
  memory         = 2048
  cpus           = 2

  output_directory = "${path.root}/build/qemu"
  vm_name          = "${local.image_name}.qcow2"

  # NoCloud seed (a CD labelled "cidata") giving the build a temporary password login.
  cd_label = "cidata"
  cd_content = {
    "meta-data" = "instance-id: smartnat-packer\nlocal-hostname: smartnat\n"
    "user-data" = <<-EOF
      #cloud-config
      ssh_pwauth: true
      users:
        - name: packer
          sudo: "ALL=(ALL) NOPASSWD:ALL"
          shell: /bin/bash
          lock_passwd: false
          plain_text_passwd: "${local.build_password}"
    EOF
  }

  ssh_username = "packer"
  ssh_password = local.build_password
  ssh_timeout  = "15m"
  # Remove the build user and what cloud-init configured for it, then power off.
  shutdown_command = "sudo sh -c 'userdel --force --remove packer; rm -f /etc/sudoers.d/90-cloud-init-users /etc/ssh/sshd_config.d/50-cloud-init.conf; shutdown -P now'"
}

build {
  name    = "smartnat"
  sources = ["source.amazon-ebs.debian12", "source.qemu.debian12"]

  # The committed source tree, one tarball per build so that parallel builds do not race.
  provisioner "shell-local" {
    inline = [
      "mkdir -p '${path.root}/build'",
      "git -C '${path.root}/..' archive --format=tar.gz --prefix=smartnat/ -o '${path.root}/build/smartnat-src-${source.name}.tar.gz' HEAD",
    ]
  }

  provisioner "file" {
    source      = "${path.root}/build/smartnat-src-${source.name}.tar.gz"
    destination = local.tarball
    generated   = true
  }

  provisioner "shell" {
    script = "${path.root}/provision.sh"
    environment_vars = [
      "SMARTNAT_SRC_TARBALL=${local.tarball}",
      "KUBE_VERSION=${var.kube_version}",
      "ENABLE_KUBE_PROXY=${var.enable_kube_proxy ? 1 : 0}",
    ]
    execute_command = "chmod +x {{ .Path }}; sudo env {{ .Vars }} {{ .Path }}"
  }

  # Leave nothing of this build in the image: instances get their own machine-id, cloud-init run
  # and SSH keys on first boot.
  provisioner "shell" {
    inline = [
      "rm -f ${local.tarball}",
      "cloud-init clean --logs",
      "truncate -s 0 /etc/machine-id",
      "rm -f /var/lib/dbus/machine-id",
    ]
    execute_command = "chmod +x {{ .Path }}; sudo env {{ .Vars }} {{ .Path }}"
  }

  provisioner "shell" {
    only            = ["amazon-ebs.debian12"]
    inline          = ["rm -f /home/admin/.ssh/authorized_keys"]
    execute_command = "chmod +x {{ .Path }}; sudo env {{ .Vars }} {{ .Path }}"
  }

  post-processor "manifest" {
    output     = "${path.root}/build/manifest.json"
    strip_path = true
  }
}
