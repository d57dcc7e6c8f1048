# IPv4 subnet arithmetic for the NixOS modules, as pure Nix (builtins only,
# so the flake tests evaluate it without nixpkgs).
#
# The worker gives its bridge the first host address of its subnet and uses
# that address as the guests' gateway (procurator/worker/network.py,
# `SubnetPlan`); the worker module configures the same bridge declaratively,
# so both must agree on that address: `bridgeAddress "10.120.0.0/24"` is
# "10.120.0.1".
let
  fail = msg: throw "procurator.net: ${msg}";

  pow2 = n: if n == 0 then 1 else 2 * pow2 (n - 1);

  isDigits = s: builtins.match "[0-9]+" s != null;

  toInt =
    what: s:
    if builtins.match "0[0-9]+" s != null then
      fail "${what}: '${s}' has a leading zero (ambiguous: some tools read it as octal)"
    else if isDigits s && builtins.stringLength s <= 3 then
      builtins.fromJSON s
    else
      fail "${what}: '${s}' is not a decimal number";

  # "a.b.c.d" -> 32-bit integer.
  parseAddress =
    text:
    let
      octets = builtins.filter builtins.isString (builtins.split "\\." text);
      values = map (toInt "address ${text}") octets;
    in
    if builtins.length octets != 4 then
      fail "'${text}' is not an IPv4 address (four dotted octets)"
    else if builtins.any (v: v > 255) values then
      fail "'${text}' has an octet above 255"
    else
      builtins.foldl' (acc: v: acc * 256 + v) 0 values;

  formatAddress =
    n:
    let
      octet = shift: toString (builtins.bitAnd (n / pow2 shift) 255);
    in
    "${octet 24}.${octet 16}.${octet 8}.${octet 0}";

  # "10.120.0.0/24" -> { network, prefixLength, netmask, firstHost, lastHost, size }.
  parseCidr =
    text:
    let
      parts = builtins.filter builtins.isString (builtins.split "/" text);
      prefixText = builtins.elemAt parts 1;
      prefixLength =
        if isDigits prefixText && builtins.stringLength prefixText <= 2 then
          builtins.fromJSON prefixText
        else
          fail "'${text}': '${prefixText}' is not a prefix length";
      size = pow2 (32 - prefixLength);
      address = parseAddress (builtins.elemAt parts 0);
      network = address - (address - (address / size) * size);
    in
    if builtins.length parts != 2 then
      fail "'${text}' is not an IPv4 subnet in CIDR form (like 10.120.0.0/24)"
    else if prefixLength > 30 then
      fail "'${text}': prefix length ${toString prefixLength} leaves no room for a bridge and VMs (at most /30)"
    else if network != address then
      fail "'${text}' has host bits set; the subnet is ${formatAddress network}/${toString prefixLength}"
    else
      {
        inherit prefixLength size;
        network = formatAddress network;
        netmask = formatAddress (pow2 32 - size);
        firstHost = formatAddress (network + 1);
        lastHost = formatAddress (network + size - 2);
      };
in
{
  inherit parseAddress formatAddress parseCidr;

  # The bridge's (and the guests' gateway) address in `subnet`.
  bridgeAddress = subnet: (parseCidr subnet).firstHost;

  # "HOST:PORT" as the daemons' --listen flags take it; IPv6 literals get
  # brackets ("[::]:7300").
  hostPort =
    address: port:
    if !(builtins.isInt port) || port < 1 || port > 65535 then
      fail "port ${builtins.toJSON port} is not in 1-65535"
    else if builtins.match ".*:.*" address != null then
      "[${address}]:${toString port}"
    else
      "${address}:${toString port}";
}
