# The spec of small.toml as a Nix expression: shared values and a helper, as a Nix author would.
let
  recipient = "age14etvufpqjyhty3mmt88xdph427sglwpa699jkxhe3m9n9vrssg5st08shd";
  tcp = host: ports: { proto = "tcp"; inherit host ports; };
in
{
  default_disposable = "dvm";
  host = {
    hostname = "small-01";
    system = "aarch64-linux";
    hardening = "paranoid";
    dns_servers = [ "192.0.2.53" ];
    disk.device = "/dev/vda";
    disk.filesystem = "bcachefs";
  };
  compartments.sys-net = {
    network = "uplink";
    provides_network = true;
    persistence = "disposable";
    firewall = [ { cidr = "0.0.0.0/0"; } ];
  };
  compartments.work = {
    label = "blue";
    network = "sys-net";
    packages = [ "firefox" "python3Packages.requests" ];
    apps = [ "firefox" ];
    tags = [ "work" ];
    secrets = [ "vpn" ];
    persistent_paths = [ "/home/user/.mozilla" ];
    firewall = [
      { dns = true; }
      (tcp "Mail.Example.com" [ 443 "993" "8000-8080" ] // { comment = "mail"; })
    ];
  };
  disposable_templates.dvm.label = "gray";
  policy = {
    dir = "policy.d";
    rules = [ "qnix.Filecopy * work @dispvm:dvm ask" ];
  };
  secrets.vpn = {
    file = "secrets/vpn.age";
    recipients = [ recipient ];
  };
  audit.aide_paths = [ "/etc/ssh" ];
}
